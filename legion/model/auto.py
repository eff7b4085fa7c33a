"""transformers Auto classes for LEGION: after `import legion`,

    AutoConfig.from_pretrained(DIR)            -> LegionConfig       (model_type "legion")
    AutoModelForCausalLM.from_pretrained(DIR)  -> LegionForCausalLM  (CLIP loaded, ready to generate)

work on the directories this project writes (and on Hub copies of them) without `trust_remote_code`.
GLaMM/LEGION releases say `model_type: llava`, which transformers maps to its own LLaVA classes: load
those with `LegionForCausalLM.from_pretrained(DIR)` or `legion.load(DIR)`.

`install()` keeps `import legion` light (transformers takes seconds to import): when transformers'
Auto module is already loaded it registers at once; otherwise a one-shot import hook registers right
after transformers loads its Auto modules (`configuration_auto`, then `modeling_auto`), i.e. before
anyone can use an Auto class. The model class is registered through a stand-in that imports the model code
(SAM, LLaMA modeling) only when a model is actually loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODEL_MODULE = "transformers.models.auto.modeling_auto"
OUR_CONFIG_MODULE = "legion.model.configuration"


def register_config(config_class) -> None:
    from transformers import AutoConfig

    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def register_model(config_class) -> None:
    from transformers import AutoModelForCausalLM

    class LegionForCausalLMAuto:
        """What AutoModelForCausalLM finds for LegionConfig: loads `legion.model.legion.LegionForCausalLM`."""

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            from legion.model.legion import LegionForCausalLM

            kwargs.pop("config", None)  # the directory's own config.json is read (GLaMM spellings included)
            return LegionForCausalLM.from_pretrained(*args, **kwargs)

        @classmethod
        def _from_config(cls, config, **kwargs):
            from legion.model.legion import LegionForCausalLM

            return LegionForCausalLM._from_config(config, **kwargs)

    LegionForCausalLMAuto.config_class = config_class
    AutoModelForCausalLM.register(config_class, LegionForCausalLMAuto, exist_ok=True)


def _loading(module_name: str) -> bool:
    """True while `module_name` is being imported (in sys.modules, not finished)."""
    spec = getattr(sys.modules.get(module_name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def sync(config_class=None, finished: str | None = None) -> None:
    """Register with each of transformers' Auto modules that is fully loaded (`finished`: the module whose
    code has just run, although the import system still marks it as loading). Registration imports
    LegionConfig, so it waits while our configuration module or modeling_auto is half imported: the end of
    legion/model/configuration.py and the import hook below call this again when they are done."""

    def loaded(name: str) -> bool:
        return name in sys.modules and (name == finished or not _loading(name))

    if CONFIG_MODULE not in sys.modules and MODEL_MODULE not in sys.modules:
        return  # nothing to register with yet (and importing LegionConfig now would load transformers)
    if MODEL_MODULE in sys.modules and not loaded(MODEL_MODULE):
        return  # modeling_auto is half imported: importing LlamaConfig now would re-enter it
    if config_class is None:
        if _loading(OUR_CONFIG_MODULE):
            return  # it calls sync(LegionConfig) at its end
        from legion.model.configuration import LegionConfig as config_class
    if loaded(CONFIG_MODULE):
        register_config(config_class)
    if loaded(MODEL_MODULE):
        register_model(config_class)


class _SyncAfterImport(importlib.abc.MetaPathFinder):
    """Lets the real loader import transformers' Auto modules, then registers with them (once each)."""

    def __init__(self):
        self.pending = {name for name in (CONFIG_MODULE, MODEL_MODULE) if name not in sys.modules}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real finders (this one no longer answers for it)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_sync(module):
            exec_module(module)
            try:
                sync(finished=fullname)
            except Exception as exc:  # never break transformers' own import
                warnings.warn(f"LEGION could not register with transformers' Auto classes: {exc!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_sync
        return spec


def install() -> None:
    """Register with the Auto modules transformers has loaded, and with the others as soon as they load."""
    sync()
    if any(name not in sys.modules for name in (CONFIG_MODULE, MODEL_MODULE)) and not any(
        isinstance(finder, _SyncAfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _SyncAfterImport())
