"""The trained model in use, outside the benchmark: folder features, feature parts, the gallery index, ONNX.

* ``features``: load a checkpoint for inference, list and encode any image folder (``FeatureSet``);
* ``feature_parts``: feature files written in parts by several processes, any mix read as one;
* ``index``: a gallery index in memory (faiss): parameters, build, search, exact top-k, recall;
* ``index_store``: the index on disk: a folder written crash-safely (staging, recovery), read back;
* ``export``: the ONNX export of the retrieval path, checked with onnxruntime.

Features are compared by the project's one distance rule, ``utils.distance.DistanceSpec``. Nothing
below this room imports it (training and the benchmark evaluation live in ``processor/``).
"""
