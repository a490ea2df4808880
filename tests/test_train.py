"""Training reaches well above chance on held-out data; divergence is flagged."""

import math

import torch

from moe_energy.data import make_dataset
from moe_energy.measure.records import training_failure, training_note
from moe_energy.models import DenseMLP, MoE
from moe_energy.train import evaluate, train


def test_moe_and_dense_learn_the_synthetic_task():
    # Enough samples per feature that the task generalises (the seed's 784-d task mostly memorises).
    data = make_dataset(3000, 40, 4, seed=0, test_fraction=0.2)
    for model in (MoE(4, 32, 2, 2, input_dim=40, classes=4, strategy="padded"), DenseMLP(40, 48, 2, 4)):
        torch.manual_seed(0)
        res = train(model, data, epochs=6, lr=3e-3, batch_size=64, device=torch.device("cpu"))
        assert len(res.epoch_loss) == 6
        assert res.epoch_loss[-1] < res.epoch_loss[0]
        assert res.test_accuracy > data.chance_accuracy + 0.3, (type(model).__name__, res.test_accuracy)
        assert not res.diverged


def test_non_finite_loss_is_flagged_diverged():
    data = make_dataset(400, 20, 3, seed=1, test_fraction=0.25)
    model = DenseMLP(20, 16, 2, 3)
    res = train(model, data, epochs=3, lr=1e30, batch_size=32, device=torch.device("cpu"))
    assert res.diverged
    assert "loss is nan" in res.diverged_reason or "at chance" in res.diverged_reason
    assert res.failure == ("diverged" if "loss is" in res.diverged_reason else "did not learn")


def test_training_that_stays_at_chance_did_not_learn_and_is_not_called_diverged():
    # labels drawn apart from the inputs: nothing to learn, so held-out accuracy stays at chance with a finite loss
    data = make_dataset(400, 20, 4, seed=1, test_fraction=0.25)
    g = torch.Generator().manual_seed(0)
    data.y_train = torch.randint(0, 4, data.y_train.shape, generator=g)
    data.y_test = torch.randint(0, 4, data.y_test.shape, generator=g)
    res = train(DenseMLP(20, 8, 1, 4), data, epochs=1, lr=1e-3, batch_size=32, device=torch.device("cpu"))
    assert all(map(math.isfinite, res.epoch_loss))
    assert res.diverged and res.failure == "did not learn" and "at chance" in res.diverged_reason
    rec = {"diverged": True, "train": res.as_dict()}
    assert training_failure(rec) == "did not learn"
    assert training_failure({"diverged": True, "train": {"diverged_reason": "loss is nan"}}) == "diverged"  # older
    assert training_failure({"diverged": False}) is None


def test_an_untrained_model_is_called_untrained_not_diverged():
    # --epochs 0 measures the random initialisation: its accuracy is no trained result, whatever it happens to be
    data = make_dataset(200, 20, 3, seed=1, test_fraction=0.25)
    res = train(DenseMLP(20, 8, 1, 3), data, epochs=0, lr=1e-3, batch_size=32, device=torch.device("cpu"))
    assert res.epoch_loss == [] and res.test_accuracy is not None
    assert res.diverged and res.failure == "untrained" and "--epochs 0" in res.diverged_reason
    rec = {"diverged": res.diverged, "train": res.as_dict()}
    assert training_failure(rec) == "untrained"
    assert training_note(rec) == f"untrained ({res.diverged_reason})"
    assert training_note({"diverged": True, "train": {"failure": "did not learn", "diverged_reason": "at chance"}}) \
        == "training did not learn (at chance)"
    assert training_note({"diverged": False}) is None


def test_train_accuracy_is_the_final_weights_on_the_training_set_not_the_last_epochs_running_figure():
    # lr 0.05 moves the weights a lot within the one epoch: the running figure (counted while they changed) is
    # not what the trained model scores on its training data, which one more pass (evaluate) measures
    data = make_dataset(600, 20, 4, seed=2, test_fraction=0.25)
    torch.manual_seed(0)
    model = DenseMLP(20, 32, 2, 4)
    res = train(model, data, epochs=1, lr=0.05, batch_size=32, device=torch.device("cpu"))
    final = evaluate(model, data.x_train, data.y_train, 32, torch.device("cpu"))
    assert res.train_accuracy == final
    assert abs(res.train_accuracy - res.epoch_train_accuracy[-1]) > 0.02  # the two figures differ here
    assert "train_accuracy" in res.as_dict()
