"""The files that stages hand each other (docs/CONTRACTS.md), in one layer below every stage.

Stages depend on this layer, never on each other's internals: reading and writing run folders and checkpoints
(checkpoint.py, runs.py), the text normalization that defines a corpus's clean_text (text.py), the safety
classifier that `data prepare --drop-toxic` and `serve --moderate` load (safety.py), the task prompts that
`data tasks` trains on and `compose` / `reply` / `summarize` send (prompts.py), and finding input files and
writing output files atomically (files.py). Nothing here imports a stage; tests/test_imports.py keeps it so.
"""
