"""SelfCodeAlign's generation-free stages (seeds, response parsing, sandboxed validation,
selection) as JSONL-in/JSONL-out functions: `from starcoder.selfalign import seeds, validate, select`."""
