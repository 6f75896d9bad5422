"""The sizes every speed figure uses, defined once."""

from __future__ import annotations

from pathlib import Path

PAPER_ITEMS = 12_101  # Beauty's catalogue (paper Table 1): the "paper-size" graph, d=128, L=20, T=20
PUBLISHED_EPOCH_SECONDS = 510  # one Office epoch of the published code on the 2-core development machine


def open_gates(model):
    """Draw the decoder's rezero gates (normal), as after training: at their initial 0 every reverse
    step is the identity, so a parity check on such a model never sees the decoder (and a graph that
    stops after S steps equals the T-step one)."""
    import torch

    gate = getattr(model.decoder, "gate", None) if model.decoder is not None else None
    if gate is not None:
        with torch.no_grad():
            torch.nn.init.normal_(gate)
    return model


def random_model(path: str | Path, items: int = PAPER_ITEMS, hidden_size: int = 128, steps: int = 20,
                 max_len: int = 20, heads: int = 4, seed: int = 0, decoder: bool = True) -> Path:
    """A model file with random weights of the paper's size (speed does not depend on the weights), its
    decoder gates drawn (``open_gates``) so that parity checks on it see every reverse step."""
    import torch

    from cddrec.checkpoint import save_checkpoint
    from cddrec.config import ModelConfig
    from cddrec.model import CDDRec
    from cddrec.vocab import Vocab

    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=items, hidden_size=hidden_size, steps=steps, max_len=max_len, num_heads=heads,
                      decoder=decoder)
    model = open_gates(CDDRec(cfg).eval())
    save_checkpoint(path, model, Vocab.build(str(i) for i in range(items)), torch.ones(cfg.num_rows, dtype=torch.long))
    return Path(path)
