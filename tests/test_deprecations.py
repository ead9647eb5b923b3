"""Names that moved or were renamed keep working for one release, with a DeprecationWarning naming the new
place; the new names work without one."""

import warnings

import pytest


def test_token_throughput_moved_to_callbacks():
    from lightning_optim.callbacks import TokenThroughput
    from lightning_optim.callbacks.throughput import TokenThroughput as direct

    assert TokenThroughput is direct
    with pytest.warns(DeprecationWarning, match=r"lightning_optim\.callbacks\.TokenThroughput"):
        from lightning_optim.models.throughput import TokenThroughput as old
    assert old is TokenThroughput
    import lightning_optim.models as models

    with pytest.warns(DeprecationWarning, match="moved"):
        assert models.TokenThroughput is TokenThroughput
    assert "TokenThroughput" not in models.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lightning_optim.callbacks import TokenThroughput as again  # the new path: no warning
    assert again is TokenThroughput
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        models.Nope
