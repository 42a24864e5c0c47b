"""Run under `accelerate launch` (two processes, on one machine or on two): train 8 epochs in two parts
(`first`: stop after 3 epochs, as a time-limited job does; `resume`: continue after the requeue) or in
one (`all`), then record which test images each rank evaluates and evaluate the saved model.pt.

Each rank writes OUT/rank{r}_{phase}.json: its status, the process count, the epoch and step it started
training at, and every step's loss on that rank (epoch, global step, loss)."""
import json
import sys
from pathlib import Path

import torch

from fasttrain.config import Config
from fasttrain.engine import Engine
from fasttrain.entry import end_process
from fasttrain.evaluate import evaluate_checkpoint

EPOCHS, STOP_AFTER = 8, 3

phase, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = Config(data=data, out=str(out), arch="resnet20", width=0.5, epochs=EPOCHS, batch_size=16, lr=0.1,
             schedule="cosine", loader="device", workers=1, stop_after_epochs=STOP_AFTER if phase == "first" else 0,
             resume=str(out) if phase == "resume" else "")
engine = Engine(cfg)
steps, started = [], {}
step_loss, train_epoch = engine.method.loss, engine.train_epoch


def recorded_loss(model, batch, epoch):
    loss, logs = step_loss(model, batch, epoch)
    steps.append((epoch, engine.state["step"], loss.detach().clone()))
    return loss, logs


def recorded_epoch(epoch):
    started.setdefault("epoch", epoch)
    started.setdefault("step", engine.state["step"])
    return train_epoch(epoch)


engine.method.loss, engine.train_epoch = recorded_loss, recorded_epoch
status = engine.fit()
acc = engine.accelerator
rank = acc.process_index
if status == "done":
    engine.eval_loader.set_epoch(0)
    seen = torch.cat([b.indices for b in engine.eval_loader]).tolist()
    (out / f"eval_seen{rank}.json").write_text(json.dumps(seen))
    evaluate_checkpoint(data, out / "model.pt", loader="device", workers=1, out=out / "evaluated", accelerator=acc)
(out / f"rank{rank}_{phase}.json").write_text(json.dumps({
    "status": status, "world": acc.num_processes, "started": started, "step": engine.state["step"],
    "steps": [(e, s, loss.item()) for e, s, loss in steps]}))
acc.wait_for_everyone()
acc.end_training()
end_process(0)   # fasttrain/entry.py: a rank of a finished run ends without finalisation
