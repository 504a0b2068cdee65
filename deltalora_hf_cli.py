"""The ``deltalora-hf`` console script.

It lives outside the package so that code runs before ``import deltalora_hf``, which imports PEFT, transformers and
torch (10-30 s on a small machine):

* the command line is parsed and checked first, so ``--help`` and a bad argument answer at once. The parser's module
  (``deltalora_hf/compare/settings.py``, standard library only) is loaded from its file, without running the
  package's ``__init__``; the command then parses the same arguments again with the package's own copy.
* bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" on CPUs with AVX512-BF16 when the
  optional ``kernels`` package is missing or, offline, has not cached that kernel (``import peft`` imports
  bitsandbytes); offline, ``kernels`` also logs "Skipping publisher trust check" for it. Nothing of the command can
  act on either, and only code that runs before the import can hide them (``--verbose`` shows them). The library
  itself leaves other libraries' logging alone.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import sys
from pathlib import Path
from types import ModuleType

# logger -> the start of the one message of it that is hidden
_HIDDEN = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


def _hide(logger: str, start: str) -> None:
    logging.getLogger(logger).addFilter(lambda record: not str(record.msg).startswith(start))


def _settings_module() -> ModuleType | None:
    """``deltalora_hf.compare.settings`` loaded from its file, without importing ``deltalora_hf``; ``None`` if the
    package is not installed as files (then the full import parses the arguments)."""
    package = importlib.util.find_spec("deltalora_hf")
    for folder in (package.submodule_search_locations or []) if package else []:
        path = Path(folder) / "compare" / "settings.py"
        spec = importlib.util.spec_from_file_location("_deltalora_hf_cli_settings", path)
        if path.is_file() and spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
            spec.loader.exec_module(module)
            return module
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = _settings_module()
    if settings is not None:
        args = settings.build_parser().parse_args(argv)  # --help and usage errors exit here
        try:
            settings.settings_from_args(args)
        except ValueError as error:
            print(f"deltalora-hf {args.command}: {error}", file=sys.stderr)
            return 2
    if "--verbose" not in argv:
        for logger, start in _HIDDEN.items():
            _hide(logger, start)
    from deltalora_hf.compare import main as compare_main

    return compare_main(argv, command=shlex.join(["deltalora-hf", *argv]))


if __name__ == "__main__":
    sys.exit(main())
