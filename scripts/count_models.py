"""Rewrite src/coatnet/models/counts.json: the parameters and multiply-adds of every registered variant with
3 input channels and its own head, at 224 px and at its own img_size, counted on the meta device. Run it after
changing or adding a variant (tests/test_cli_models.py fails until then; `coatnet models` stays correct
meanwhile, only slower, as it counts what the table lacks).

    PYTHONPATH=src python3 scripts/count_models.py
"""
from coatnet.models import get_config, list_models
from coatnet.models.flops import COUNTS_FILE, write_counts_table


def main() -> None:
    configs = [(name, get_config(name, img_size=size)) for name in list_models()
               for size in sorted({224, get_config(name).img_size})]
    print(f"{COUNTS_FILE}: {write_counts_table(configs)} configs")


if __name__ == "__main__":
    main()
