"""``python tiny_inception_cli.py ARGS...``: the dumo command line with a tiny, randomly initialised
Inception-like network in place of Inception-v3 (64 pool features, 16 logits), for tests that run
FID and IS under torchrun in seconds. Every rank builds the same network from a fixed seed."""

import sys

import torch
from torch import nn

import dumo.metrics.fid_stats as fid_stats
import dumo.metrics.inception as inception
from dumo.cli import main

FEATURES, CLASSES = 64, 16


class TinyInception:
    """Resize to 32 px, two convolutions, average pool: features (N, 64) and logits (N, 16), float64."""

    def __init__(self, weights, device="cpu", batch_size=100):
        torch.manual_seed(0)
        self.network = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, FEATURES, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).to(device)
        self.classifier = nn.Linear(FEATURES, CLASSES).to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def embed(self, pixels):
        x = pixels.to(self.device).float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features = self.network(nn.functional.interpolate(x, size=(32, 32), mode="bilinear"))
        return features.double(), self.classifier(features).double()


inception.InceptionNetwork = TinyInception
inception.FEATURE_DIM = fid_stats.FEATURE_DIM = FEATURES
inception.LOGITS_DIM = fid_stats.LOGITS_DIM = CLASSES

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
