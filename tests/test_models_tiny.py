import torch

from kledger.editors.models import fingerprint, load_model
from kledger.editors.scoring import greedy, score_targets
from kledger.editors.sites import sites_for


def test_tiny_models_load_through_real_path(tiny_dir):
    model, tok, info = load_model(str(tiny_dir), "cpu")
    assert info.fingerprint == fingerprint(tiny_dir)
    s = sites_for(model)
    w = model.get_parameter(s.mlp_out_param(0))
    # the MLP output projection maps intermediate → hidden; Conv1D stores it transposed
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    assert (w.shape[1] if s.mlp_out_transposed else w.shape[0]) == hidden
    lp = score_targets(model, tok, ["The Eiffel Tower is located in"], [" Paris"])
    assert lp.shape == (1,) and torch.isfinite(lp).all() and lp.item() < 0
    assert isinstance(greedy(model, tok, "The city of", 2), str)
