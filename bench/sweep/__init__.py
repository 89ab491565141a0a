"""The sweep engine: sweep files, trials on Optuna storage, local and cluster workers.

- ``spec``: the sweep-file schema (validated before anything runs);
- ``grid``: expansion into trials keyed by ``RunConfig.key()``;
- ``storage``: Optuna storage (journal file or database), leases/heartbeats, URL masking;
- ``trials``: the queue on a study: queue, claim, finish, count (exactly-once rules);
- ``worker``: one worker's loop; ``local``: N local joblib workers with live progress;
- ``slurm``: sbatch array scripts; ``status``: the state of a sweep; ``cli``: the commands.
"""
