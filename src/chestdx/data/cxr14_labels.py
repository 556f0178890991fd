"""The ChestX-ray14 label set (Wang et al., CVPR 2017), as NIH's Data_Entry_2017.csv spells it.

AG-CNN (Guan et al.) predicts the 14 diseases plus "No Finding" (its 15-dimensional label
vector L, Sec. III-A); its Table I averages the 14 diseases only.
"""

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
CXR14_LABELS = NIH_LABELS + (NO_FINDING,)
# BBox_List_2017.csv writes "Infiltrate" where Data_Entry_2017.csv writes "Infiltration".
BOX_FINDING_NAMES = {"Infiltrate": "Infiltration"}
