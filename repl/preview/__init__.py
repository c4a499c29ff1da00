"""Pictures in the terminal: detection (``detect``), the protocols (``encoders``), sizing (``render``) and
safe reading of the files shown (``picture``). The interactive REPL draws with :func:`draw_text`; scripted
sessions never call it.
"""
