"""LEGION: learning to ground and explain for synthetic image detection.

    import legion
    analyzer = legion.load("checkpoints/legion_7b", detector="runs/detector")   # a folder or a Hub id
    result = analyzer.analyze("photo.jpg")          # verdict, explanation, phrases, masks, overlay()

Importing the package also registers LEGION with transformers' Auto classes
(`AutoModelForCausalLM.from_pretrained(DIR)`; legion/model/auto.py).
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """`legion.api.load`: a model folder or Hub id -> an analyzer (see legion/api.py)."""
    from legion.api import load as _load

    return _load(*args, **kwargs)


def _register_auto_classes() -> None:
    from legion.model.auto import install

    install()


_register_auto_classes()
