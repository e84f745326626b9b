"""Packaging driven by settings.ini (nbdev 2 convention): one place for the version and the requirements."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini")
cfg = cfg["DEFAULT"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
slurm_requirements = cfg.get("slurm_requirements", "").split()
docs_requirements = cfg.get("docs_requirements", "").split()
tensorboard_requirements = cfg.get("tensorboard_requirements", "").split()
wandb_requirements = cfg.get("wandb_requirements", "").split()
scripts = [s.strip() for s in cfg.get("console_scripts", "").split("\n") if s.strip()]
readme = Path(__file__).parent / "README.md"

setuptools.setup(
    name=cfg["repo"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else cfg["description"],
    long_description_content_type="text/markdown",
    author=cfg["author"],
    license="Apache-2.0",
    keywords=cfg["keywords"].split(),
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=[cfg["lib_name"], f"{cfg['lib_name']}.*"]),
    include_package_data=True,
    package_data={cfg["lib_name"]: ["assets/*"], f"{cfg['lib_name']}.study": ["paper.yaml"]},  # the paper's numbers (study.paper)
    install_requires=requirements,
    extras_require={"dev": dev_requirements, "slurm": slurm_requirements, "docs": docs_requirements,
                    "tensorboard": tensorboard_requirements, "wandb": wandb_requirements},
    entry_points={"console_scripts": scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
