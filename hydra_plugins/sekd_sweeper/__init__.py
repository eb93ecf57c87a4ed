"""Hydra sweeper plugin for sekd (found by Hydra's scan of the `hydra_plugins` namespace)."""

from omegaconf import OmegaConf

import sekd.config.schema  # noqa: F401,E402  (Hydra's plugin scan registers the config schema, whoever composes conf/)
from sekd.distributed.launch import tasks_per_node

# hydra/launcher=slurm asks for ${sekd.tasks_per_node:gpus,tasks_per_node} tasks on each node; registered here
# because Hydra's plugin scan imports this package in every process that composes conf/.
OmegaConf.register_new_resolver("sekd.tasks_per_node", tasks_per_node, replace=True)
