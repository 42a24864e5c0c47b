"""Run under `accelerate launch` (two processes, on one machine or on two): train 2 epochs in two parts
(`first`: stop after one epoch, as a time-limited job does; `resume`: continue after the requeue) or in
one (`all`), then record which test images each rank evaluates and evaluate the saved model.pt."""
import json
import sys
from pathlib import Path

import torch

from fasttrain.config import Config
from fasttrain.engine import Engine
from fasttrain.evaluate import evaluate_checkpoint

phase, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = Config(data=data, out=str(out), arch="resnet20", width=0.5, epochs=2, batch_size=16, lr=0.05,
             schedule="constant", loader="device", workers=1, stop_after_epochs=1 if phase == "first" else 0,
             resume=str(out) if phase == "resume" else "")
engine = Engine(cfg)
status = engine.fit()
acc = engine.accelerator
rank = acc.process_index
if status == "done":
    engine.eval_loader.set_epoch(0)
    seen = torch.cat([b.indices for b in engine.eval_loader]).tolist()
    (out / f"eval_seen{rank}.json").write_text(json.dumps(seen))
    evaluate_checkpoint(data, out / "model.pt", loader="device", workers=1, out=out / "evaluated", accelerator=acc)
(out / f"rank{rank}_{phase}.json").write_text(json.dumps({"status": status, "world": acc.num_processes,
                                                          "step": engine.state["step"]}))
acc.wait_for_everyone()
acc.end_training()
