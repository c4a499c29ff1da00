"""Textual-inversion training on the resident model (issue 7).

Modules, one job each: ``options`` (every ``!train`` option), ``schedule`` (A1111 learning-rate syntax),
``captions`` / ``templates`` (what each picture is called), ``dataset`` (checking, resizing, encoding
pictures once), ``text`` (captions -> conditioning with the trained vectors spliced in), ``plan`` (resume,
existing embedding or init text; the overwrite rule), ``trainer`` (the loop), ``checkpoint`` and
``outputs`` (the log folder), ``device`` (precision, gradient checkpointing), ``preprocess``
(``!preprocess``). Nothing here knows about the daemon; ``sdrepl.daemon.training_job`` drives a
:class:`~sdrepl.core.training.trainer.Trainer` one step at a time.

This package imports nothing itself: the REPL imports ``options`` (and ``templates``) to check a
``!train`` line before sending it, and must not pay for loading torch.
"""
