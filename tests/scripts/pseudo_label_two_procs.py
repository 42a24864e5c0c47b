"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU): pseudo-label BASE_RUN's pool of DATA
into OUT, each rank its evaluation block."""
import sys
from pathlib import Path

from accelerate import Accelerator

from fasttrain.entry import end_process
from fasttrain.pseudo_label import pseudo_label

base_run, data, out = map(Path, sys.argv[1:4])
acc = Accelerator()
pseudo_label(base_run, data, out, loader="ffcv", batch_size=16, accelerator=acc, workers=1)
acc.end_training()
end_process(0)   # fasttrain/entry.py: a rank of a finished run ends without finalisation
