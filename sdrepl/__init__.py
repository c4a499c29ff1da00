"""sdrepl: a resident Stable Diffusion daemon and a REPL built around textual-inversion embeddings.

The import package is split by job: ``sdrepl.core`` (formats, library, prompt language, conditioning,
models, training; no user I/O, no sockets), ``sdrepl.daemon`` (server, queue, watcher, lifecycle) and
``sdrepl.repl`` (the prompt_toolkit client and scripted sessions).
"""

__version__ = "0.1.0"
