"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU): train, then dump what each rank has:
its parameters and buffers, the training images it saw, and the logits of each image it evaluated, computed by
the model as it stood when the engine evaluated it (the last evaluation)."""
import json
import sys
from pathlib import Path

import torch

from fasttrain.config import Config
from fasttrain.engine import Engine
from fasttrain.entry import end_process

data, out, loader = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = Config(data=data, out=str(out / "run"), arch="resnet20", width=0.5, epochs=8, batch_size=16, lr=0.1,
             schedule="cosine", loader=loader, workers=1)        # long enough to learn (well above chance)
evaluated = {}   # epoch -> {test image: logits}
evaluate = Engine.evaluate


def recording_evaluate(self, epoch, split=None):
    """The engine's evaluation, and this rank's logits per test image from the same model at the same moment."""
    model = self.accelerator.unwrap_model(self.model)
    was_training = model.training
    model.eval()
    self.eval_loader.set_epoch(0)
    with torch.no_grad():
        evaluated[epoch] = {int(i): row.tolist() for b in self.eval_loader
                            for i, row in zip(b.indices, model(b.images).float())}
    model.train(was_training)
    return evaluate(self, epoch, split)


Engine.evaluate = recording_evaluate
engine = Engine(cfg)
engine.fit()
acc = engine.accelerator
model = acc.unwrap_model(engine.model)
torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{acc.process_index}.pt")
seen = torch.cat([b.indices for b in (engine.train_loader.set_epoch(0) or engine.train_loader)])
(out / f"seen{acc.process_index}.json").write_text(json.dumps(seen.tolist()))
(out / f"logits{acc.process_index}.json").write_text(json.dumps(evaluated[cfg.epochs - 1]))   # the final model
acc.wait_for_everyone()
acc.end_training()
end_process(0)   # fasttrain/entry.py: a rank of a finished run ends without finalisation
