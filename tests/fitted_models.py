"""Test models with real class margins, in 2 s and without training (shared by the export and verify tests)."""

import torch

from rslad_edge.models import create_model


def ridge_fitted_smallcnn(arch: str = "smallcnn") -> torch.nn.Module:
    """A smallcnn (or smallcnn-wide) that predicts every class: BatchNorm statistics measured on shapes images, then
    the classifier fitted by ridge regression on the random features (~20-40% clean accuracy).

    A random net predicts one class for nearly everything and agrees with anything; this one spreads its predictions
    over the classes with real margins, so agreement and robustness figures mean something.
    """
    from rslad_edge.data import load_dataset, to_float

    torch.manual_seed(0)
    model = create_model(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the forward passes below
    train = load_dataset("shapes", None, "train", seed=0, n_train=512)
    images = to_float(train.images)
    with torch.no_grad():
        for batch in images.split(128):
            model(batch)
        model.eval()
        features = torch.cat([model.features(images), torch.ones(len(images), 1)], 1)  # (N, F + 1): a bias column
        targets = torch.nn.functional.one_hot(train.labels, 10).float() * 10 - 1
        gram = features.T @ features + 100 * torch.eye(features.shape[1])  # ridge: a smooth head, robust to rounding
        solution = torch.linalg.solve(gram, features.T @ targets)  # (F + 1, 10)
        model.linear.weight.copy_(solution[:-1].T)
        model.linear.bias.copy_(solution[-1])
    return model


def outlier_model(scale: float = 100.0) -> torch.nn.Module:
    """:func:`ridge_fitted_smallcnn` with one BatchNorm channel scaled up ``scale`` times and the next convolution's
    weights for that channel scaled down to match: the same function in float, but that layer's per-tensor
    activation range grows ``scale`` times, so int8 rounds every other channel of it to a few levels."""
    model = ridge_fitted_smallcnn()
    batch_norm, next_conv = model.features[4], model.features[7]  # BN of block 2; the conv after its MaxPool
    with torch.no_grad():
        batch_norm.weight[0] *= scale
        batch_norm.bias[0] *= scale
        next_conv.weight[:, 0] /= scale
    return model
