"""Pure library code: embedding formats and library, prompt language, conditioning, models, training.

Nothing in here talks to users or sockets; ``daemon`` and ``repl`` build on it.
"""
