"""graphc.optim: optimizers whose update rules are graph nodes.

    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = opt.compile_step(lambda xb, yb: gc.cross_entropy(model(xb), yb), x, y)
    loss = step(x_batch, y_batch)     # forward + backward + update, one call
    opt.lr = 0.01                     # takes effect at the next call, no recompiling
"""
from .adam import Adam, AdamW
from .lr_scheduler import (CosineAnnealingLR, ExponentialLR, LambdaLR, LRScheduler,
                           MultiStepLR, StepLR)
from .optimizer import Optimizer, TrainStep
from .sgd import SGD

__all__ = ["Optimizer", "TrainStep", "SGD", "Adam", "AdamW", "LRScheduler", "StepLR",
           "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "LambdaLR"]
