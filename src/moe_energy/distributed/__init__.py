"""Expert parallelism on torch.distributed: experts sharded over ranks, tokens moved by all-to-all.

Launched by ``torchrun`` (one process per device; NCCL on GPUs, gloo on CPUs). Every rank holds the MoE's
router (and an LLM layer's shared experts) and E/W of its experts; each forward routes with the module's own
router, sends every (token, expert) pair to the rank owning the expert, runs the local experts with the
``grouped`` strategy's chain over the module's expert family and sends the results back. The seed's
classifier MoE and an LLM MoE layer (``run --arch``) take this one path. Beside it the dense baselines run
data-parallel on the same ranks, so MoE and dense compare equal hardware. Every rank measures its own
devices over the same windows; rank 0 gathers them and writes the job's results. A rank that dies or hangs
makes the others fail their next collective within ``--collective-timeout`` seconds with a one-line
``PeerLost`` (exit 3 from the CLI).

  group            the process group, collectives as one-line PeerLost, the start-up agreement
  expert_parallel  ExpertParallelMoE (wraps a sharded MoE or LLM MoELayer) and its all-to-all CommStats
  job              the run skeleton's team on ranks (``Ranks``): any workload's run, windows of an agreed count

Submodules are imported directly.
"""
