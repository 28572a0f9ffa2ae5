from setuptools import find_packages, setup

setup(
    name="fairseq_kd",
    version="0.1.0",
    description="Knowledge distillation for neural machine translation as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_kd", "fairseq_kd.*"]),
    # fairseq itself (ve-fairseq==0.12.3) is installed by scripts/setup.sh with --no-deps: its metadata
    # asks for torchaudio, which would replace the pinned torch. These are its real run-time needs.
    install_requires=[
        "torch==2.13.0",
        "numpy>=2.0",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "bitarray",
        "cffi",
        "cython",
        "regex",
        "scikit-learn",
        "packaging",
        "tqdm",
        "sacrebleu>=2.3",
        "sentencepiece",
        "subword-nmt",
        "tensorboardX",
        "matplotlib",
        # fairseq-kd-export / -translate / -eval only; training never imports it
        "ctranslate2==4.8.5",
        "scipy",
    ],
    extras_require={"test": ["pytest", "pytest-xdist==3.8.0", "hypothesis==6.170.17"]},
    entry_points={
        "console_scripts": [
            "fairseq-kd-build-cache = fairseq_kd.build_cache:main",
            "fairseq-kd-eval = fairseq_kd.evaluate:main",
            "fairseq-kd-export = fairseq_kd.export:main",
            "fairseq-kd-translate = fairseq_kd.translate:main",
        ]
    },
)
