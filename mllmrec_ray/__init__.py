"""mllmrec_ray: pure logic of the MLLMRec-R1 pipeline (no Ray imports here)."""

__version__ = "0.1.0"
