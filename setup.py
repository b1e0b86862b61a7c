from setuptools import find_packages, setup

setup(
    name="meo_ds",
    version="0.1.0",
    description="DeepSpeed expert-parallel trainer for Mixture-of-Experts models: top-k MoE, XMoE and MEO",
    python_requires=">=3.10",
    packages=find_packages(include=["meo_ds", "meo_ds.*"]),
    package_data={"meo_ds": ["presets/*.yaml", "export/hf_remote/*.py"]},
    install_requires=[
        # On CPU machines install torch==2.13.0 first (see README) so pip does not pull a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.24,<6",  # exported remote-code models use its cache API (`cache=`, MeoCache)
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "protobuf>=4.0",  # transformers converts SentencePiece models to HF tokenizers with it
        "safetensors>=0.4",
        "sacrebleu>=2.4",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.7",  # meo-study plots
    ],
    extras_require={"test": ["pytest>=8.0"]},
    entry_points={
        "console_scripts": [
            "meo-prepare=meo_ds.data.cli:main",
            "meo-train=meo_ds.train:cli",
            "meo-export=meo_ds.export.cli:main",
            "meo-demo=meo_ds.demo:main",
            "meo-study=meo_ds.study:main",
            "meo-eval=meo_ds.checkpoint_eval:cli",
            "meo-upcycle=meo_ds.upcycle:main",
        ]
    },
)
