"""Language-specific subnetworks for multi-source fine-tuning (Choenni-style; see the README).

A batch of language l may only update the entries of l's subnetwork mask m_l. Masks come from the
same selection code as SFTs (LT-SFT change magnitude or DeFT-X denoised scores), found before
training (static) or re-selected during it (dynamic), optionally whole attention heads and FFN
neurons (structured); first-order meta-learning (Reptile, FOMAML) can wrap the restricted updates.

Modules: ``config`` (what a user sets), ``structure`` (heads and neurons of an encoder),
``masks`` (selection, union, the mask an unseen target uses), ``update`` (restricting a step to a
language's mask), ``meta`` (meta-gradients), ``train`` (the training loop), ``artifact`` (the
trained model on disk and its per-target SFTs).
"""
