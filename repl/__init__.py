"""The terminal REPL (prompt_toolkit) and scripted sessions; talks to the daemon only through the protocol."""
