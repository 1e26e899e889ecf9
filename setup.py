"""Packaging for the GA360 -> WALS recommendation pipeline.

`pip install -e .` for local work; `--setup_file ./setup.py` ships the same packages to
Dataflow and Flink workers.
"""

import setuptools

REQUIRED = [
    # The three pins below are tested together on Python 3.11.
    "apache-beam[gcp]>=2.77,<2.78",
    "tensorflow-transform>=1.21,<1.22",
    "tensorflow>=2.21,<2.22",
    # TF Transform's own companions, imported directly: TFXIO feeds it Arrow RecordBatches
    # (transforms/preprocessing.py), and tfx_bsl's C++ coder encodes the matrix's Examples
    # (pipeline/matrix_io.py). Same ranges as tensorflow-transform 1.21 requires.
    "tfx-bsl>=1.21,<1.22",
    "pyarrow>14",
    # tf.summary.scalar needs it; TF 2.21 no longer installs it.
    "tensorboard>=2.20",
    "numpy>=1.26",
    # pipeline/records.py parses JSONL sessions with it.
    "orjson>=3.9.7,<4",
    "tqdm>=4.66",
    # common/object_store.py: generation preconditions for the gs:// locks and pointer (Beam's
    # gcs filesystem has none). The range apache-beam[gcp] 2.77 requires.
    "google-cloud-storage>=2.18.2,<4",
    # common/worker_threads.py sizes a worker process's BLAS and OpenMP pools with it.
    "threadpoolctl>=3.1,<4",
]
# Beam's filesystems beyond gs:// (README, Other object stores); the extras only add the client
# each one loads, so they pin Beam as REQUIRED does.
BEAM_S3 = "apache-beam[aws]>=2.77,<2.78"  # s3:// (boto3)
BEAM_HDFS = "apache-beam[hadoop]>=2.77,<2.78"  # hdfs:// over WebHDFS (hdfs)

EXTRAS = {
    # tests/test_s3.py reads s3:// through Beam, against moto's server (in a venv of its own).
    "test": ["pytest>=8", "pytest-timeout>=2.3", BEAM_S3],
    "aws": [BEAM_S3],
    "hadoop": [BEAM_HDFS],
    # Peers for benchmarks/ only: never imported by the product.
    "bench": ["implicit>=0.7", "pyspark>=3.5", "psutil>=5.9"],
    "lint": ["ruff>=0.6"],
}

setuptools.setup(
    name="ga-wals-recommender",
    version="0.1.0",
    description="GA360 session logs -> TF Transform -> WALS recommendations, on Apache Beam.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=[
            "common",
            "common.*",
            "pipeline",
            "pipeline.*",
            "transforms",
            "transforms.*",
            "trainer",
            "trainer.*",
        ]
    ),
    install_requires=REQUIRED,
    extras_require=EXTRAS,
)
