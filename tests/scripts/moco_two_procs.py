"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU): two MoCo steps on a tiny model, each
rank with its own images; dump the keys, the queue and the weights of each rank to OUT/rank{r}.pt."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from fasttrain.entry import end_process
from fasttrain.methods.moco import MoCoModel
from fasttrain.models import build_model

out = Path(sys.argv[1])
acc = Accelerator()
torch.manual_seed(0)                                   # the same initial weights and queue on both ranks
model = MoCoModel(build_model("resnet20", 8, width=0.25), 8, queue_size=32)
optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
model, optimizer = acc.prepare(model, optimizer)
moco = acc.unwrap_model(model)
im_q, im_k = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(100 + acc.process_index))

# step 1 in eval mode: BatchNorm uses running statistics, so the keys do not depend on the cross-rank
# shuffle and each rank can compute its own keys directly
model.eval()
with torch.no_grad():
    keys = F.normalize(moco.encoder_k(im_k), dim=1)
    q = F.normalize(moco.encoder_q(im_q), dim=1)
    logits = model(im_q, im_k)
result = {"keys": keys, "queue_after_first": moco.queue.clone(), "ptr_after_first": moco.queue_ptr.item(),
          "positives": logits[:, 0] * moco.temperature, "expected_positives": (q * keys).sum(1)}

# step 2 in train mode: shuffling BN across the ranks, backward through DDP, momentum update
model.train()
logits = model(im_q, im_k)
acc.backward(F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)))
optimizer.step()
moco.momentum_update()
result.update(queue=moco.queue.clone(), queue_ptr=moco.queue_ptr.clone(),
              encoder_q={k: v.detach().clone() for k, v in moco.encoder_q.named_parameters()},
              encoder_k={k: v.detach().clone() for k, v in moco.encoder_k.named_parameters()})
torch.save(result, out / f"rank{acc.process_index}.pt")
acc.wait_for_everyone()
acc.end_training()
end_process(0)   # fasttrain/entry.py: a rank of a finished run ends without finalisation
