"""The distributed side of training, the only home of DeepSpeed and torch.distributed collectives:
the DeepSpeed engine behind the phase runner (``engine``), the runtime that runs the two-phase SFT
on every rank (``runtime``) and the exact distributed mask selection (``selection``)."""
