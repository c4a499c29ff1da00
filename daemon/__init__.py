"""The daemon: resident model, protocol server, job queue, folder watcher, lifecycle."""
