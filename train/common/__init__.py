"""What every layer of the trainer shares: the Cityscapes class table and the constants around it.

Defined once here (the lowest layer) so that data, models, the method and evaluation agree on them.
The class names and colours come from cityscapesscripts' label table (trainIds 0..18).
"""

from __future__ import annotations

from cityscapesscripts.helpers.labels import trainId2label

from pipeline.rcs_stats import NUM_CLASSES

#: Label value that no loss and no metric counts (Cityscapes' and DSEC's "void").
IGNORE = 255

#: The 19 Cityscapes evaluation classes, in trainId order.
CLASSES: tuple[str, ...] = tuple(trainId2label[i].name for i in range(NUM_CLASSES))

#: DAFormer/CMDA image normalisation, on the 0..255 scale (mmseg's ``img_norm_cfg``).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

__all__ = ["CLASSES", "IGNORE", "IMAGENET_MEAN", "IMAGENET_STD", "NUM_CLASSES"]
