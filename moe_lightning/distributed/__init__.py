"""Parallelism, pure torch.distributed: the ``all_to_all`` token exchange of expert parallelism
(``expert_parallel``) and the device mesh and FSDP2 x expert-parallel layout of a model (``parallelize``). The
Lightning strategy that uses them is :class:`moe_lightning.lightning.ExpertParallelStrategy`."""
