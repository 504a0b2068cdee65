"""Integrations with training frameworks that extend through their own plugin APIs (optional dependencies).

- :mod:`deltalora_hf.integrations.axolotl`: ``adapter: deltalora`` in an Axolotl YAML config
  (``pip install -e ".[axolotl]"`` in a clone, Python >= 3.12).
"""
