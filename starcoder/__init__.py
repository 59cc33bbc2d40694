"""starcoder: an open pretraining stack for StarCoder / StarCoder2 code models."""

__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None):
    """Load a model folder (native or Hugging Face) and return the model in eval mode.

    Calling the model on `input_ids` [batch, seq] returns logits [batch, seq, vocab_size] over the
    real vocabulary (padded rows excluded).
    """
    from starcoder.api import load_model as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["load_model", "__version__"]
