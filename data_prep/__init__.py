"""Offline converters: source datasets -> long-tailed fasttrain dataset directories (see DESIGN.md).

`python -m data_prep.convert --help` for the CLI; `data_prep.convert.write_dataset` for the API.
Submodules are imported lazily so that `import data_prep` stays light.
"""


class ConvertError(ValueError):
    """Bad input for a conversion. The message names the file or value and how to fix it."""
