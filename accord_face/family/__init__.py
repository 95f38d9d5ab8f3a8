"""The IP-Adapter-FaceID family beyond plain FaceID: FaceID-Plus / Plus-V2 (CLIP face crop), Portrait
(n photos of one person), and the jointly trained identity LoRA.

- ``clip_image``: the frozen CLIP vision tower, the aligned face crop from stored landmarks,
  and the dropped-identity convention for the CLIP states.
"""
