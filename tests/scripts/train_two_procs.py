"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU): train, then dump what each rank has."""
import json
import sys
from pathlib import Path

import torch

from fasttrain.config import Config
from fasttrain.engine import Engine

data, out, loader = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = Config(data=data, out=str(out / "run"), arch="resnet20", width=0.5, epochs=8, batch_size=16, lr=0.1,
             schedule="cosine", loader=loader, workers=1)        # long enough to learn (well above chance)
engine = Engine(cfg)
engine.fit()
acc = engine.accelerator
model = acc.unwrap_model(engine.model)
torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{acc.process_index}.pt")
seen = torch.cat([b.indices for b in (engine.train_loader.set_epoch(0) or engine.train_loader)])
(out / f"seen{acc.process_index}.json").write_text(json.dumps(seen.tolist()))
acc.wait_for_everyone()
acc.end_training()
