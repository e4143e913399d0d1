"""Built-in declarations (:func:`~moe_lightning.adapters.register_moe`) of other libraries' MoE layers, so that
:func:`~moe_lightning.adapters.find_moe_layers` finds them with no glue. Each module matches its library's layers by
class name and structure and never imports the library; docs/adapters.md lists what each one matches."""

from moe_lightning.adapters.libraries import deepspeed_moe, lucidrains, nanomoe, st_moe, torchtitan

__all__ = ["deepspeed_moe", "lucidrains", "nanomoe", "st_moe", "torchtitan"]
