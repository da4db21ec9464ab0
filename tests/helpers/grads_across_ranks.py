"""Run under torchrun: one training step, then compare the gradients every rank ended with.

Prints "max gradient difference across ranks: X" on rank 0. With "--bypass-ddp" the objective
calls the unwrapped module, the trap that silently skips DDP's gradient averaging.
"""

import sys
import tempfile

import torch
import torch.distributed as dist

from dumo.config import load_config
from dumo.distributed import shutdown
from dumo.training import Trainer

config_path, bypass, *overrides = sys.argv[1:]
trainer = Trainer(load_config(config_path, overrides), tempfile.mkdtemp())
if bypass == "bypass":
    trainer.step_model = trainer.model
trainer.optimizer.step = lambda: None  # keep the gradients as the step left them
trainer.train_step()
grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
gathered = [torch.zeros_like(grads) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, grads)
if dist.get_rank() == 0:
    print(f"max gradient difference across ranks: {(gathered[0] - gathered[1]).abs().max().item():.3e}")
del trainer  # the DDP wrapper holds the process group
shutdown()
