"""Instruction templates as data: `templates.json` maps each task name to its template and decoding
defaults."""
