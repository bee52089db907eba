"""Component (part) masks computed offline by ``mode=segment`` and cached on disk.

Routes:

* :mod:`src.segment.cluster`: the paper's route. Per class, k part prototypes are fitted on
  the training images' patch features (greedy coreset + k-means); every image's patches are
  scored against them, the maps refined at image resolution (mean-field with an edge-aware
  filter, :mod:`src.segment.refine`) and binarised by an argmax over the parts.
* :mod:`src.segment.sam`: Segment Anything proposes masks; each one is assigned to one of k
  per-class prototypes of mean backbone features, so that slots mean the same part in
  every image of a class.

Fixes of the original's masks (SPEC 10): every image gets its own masks, found at training time
as at test time (B2); test images of every extension are segmented, not only ``*.png`` (B13);
masks are an argmax over parts stored as packed bits, not Otsu thresholds of JET-coloured JPEGs
(B8); background parts are decided over all training images of a class, not the first one (B8).

Both share the per-class background rule (:func:`src.segment.parts.select_parts`) and the
cache (:mod:`src.segment.cache`), driven by :func:`src.segment.runner.segment_dataset`.
"""
