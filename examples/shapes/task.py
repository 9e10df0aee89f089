"""The lines that make `train.py` a FlowOps task: the network for a list of classes, the image
preprocessing (the same numbers `load_image` computes, now shared by training, batch scoring,
serving and drift), and the training loop, which reuses `train_one_epoch` with the context's calls.

    cd examples && flowops train --task shapes.task:task --workers 2
"""

import torch

from flowops.task import Preprocess, Task
from shapes.train import MEAN, SIZE, STD, Net, train_one_epoch


def fit(ctx):
    model = ctx.prepare_model(ctx.model)  # to the device; DDP under Ray Train
    loader = ctx.data_loader()  # the preprocessed training images, this worker's shard
    optimizer = torch.optim.AdamW(model.parameters(), lr=ctx.lr)
    start = ctx.restore(model, optimizer)  # a restarted worker group resumes at its checkpoint
    for epoch in ctx.epochs_from(start, loader):
        loss, seen = train_one_epoch(model, loader, optimizer, ctx.device)
        ctx.report(epoch, model, optimizer, train_loss=loss, samples=seen)  # metrics + checkpoint


task = Task(
    build_model=lambda classes: Net(len(classes)),
    preprocess=Preprocess(size=SIZE, channels=3, resize="resize", mean=MEAN, std=STD),
    train_loop=fit,
)
