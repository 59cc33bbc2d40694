"""The Stack's curation pipeline on datatrove: `from starcoder.curation import curate`."""
