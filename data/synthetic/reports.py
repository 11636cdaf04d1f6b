"""Report texts of a phantom: the CT-RATE label and report columns, the phrase tables, and their composition.

Every abnormality the phantom simulates is written consistently into the impression (conc) and findings
(desc) of its anatomy, the labels CSV, and the report; absent ones are often ruled out in the findings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.common import load_anatomy_map
from data.synthetic.phantom import LUNG_LOBES, Grid, Phantom
from utils.config import REPO_ROOT

ANATOMY_MAP = REPO_ROOT / "configs" / "anatomy" / "ctrate.yaml"

# The 18 CT-RATE label columns, in the order of the released labels CSV (spec §1).
LABEL_COLUMNS: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
# Abnormalities the phantom simulates -> the anatomy whose text names them, and their prevalence
# (drawn as exactly round(p * n) scans per split, so that both classes occur and AUC is defined).
SIMULATED: dict[str, tuple[str, float]] = {
    "Emphysema": ("lung", 1 / 3),
    "Atelectasis": ("lung", 1 / 3),
    "Lung nodule": ("lung", 1 / 3),
    "Lung opacity": ("lung", 1 / 3),
    "Pleural effusion": ("lung", 1 / 3),
    "Consolidation": ("lung", 1 / 3),
    "Cardiomegaly": ("heart", 1 / 3),
    "Pericardial effusion": ("heart", 1 / 3),
    "Coronary artery wall calcification": ("heart", 1 / 3),
    "Hiatal hernia": ("esophagus", 1 / 3),
    "Arterial wall calcification": ("aorta", 1 / 3),
}

REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN",
)

LOBES: dict[str, tuple[str, str]] = dict(zip(LUNG_LOBES, (  # lobe class -> (impression, findings phrase)
    ("left upper lobe", "upper lobe of the left lung"),
    ("left lower lobe", "lower lobe of the left lung"),
    ("right upper lobe", "upper lobe of the right lung"),
    ("right middle lobe", "middle lobe of the right lung"),
    ("right lower lobe", "lower lobe of the right lung"),
), strict=True))
EFFUSION_SIDES: dict[str, tuple[str, str]] = {  # side -> (impression, findings location)
    "right": ("Pleural effusion on the right.", "on the right"),
    "left": ("Pleural effusion on the left.", "on the left"),
    "both": ("Bilateral pleural effusion.", "in both hemithoraces"),
}
AORTA_LOCATIONS = ("aortic arch", "descending aorta", "aortic arch and descending aorta", "thoracic aorta")

# Impression (conc) variants: each names the abnormality with its zero-shot prompt word.
CONC: dict[str, tuple[str, ...]] = {
    "Emphysema": ("Emphysema in both lungs.", "Centrilobular emphysema in both lungs.",
                  "Emphysema in both lungs, more prominent in the upper lobes."),
    "Lung nodule": ("Nodule in the {lobes}.", "Solid nodule in the {lobes}."),
    "Lung opacity": ("Ground glass opacity in the {lobes}.", "Opacity areas in the {lobes}."),
    "Consolidation": ("Consolidation in the {lobes}.", "Consolidation area in the {lobes}."),
    "Pleural effusion": ("{effusion}",),
    "Atelectasis": ("Atelectatic changes in the {lobes}.", "Subsegmental atelectatic changes in the {lobes}."),
    "Cardiomegaly": ("Cardiomegaly.",),
    "Pericardial effusion": ("Pericardial effusion.", "Minimal pericardial effusion."),
    "Coronary artery wall calcification": ("Coronary artery wall calcification.",
                                           "Coronary artery wall calcification, coronary atherosclerosis."),
    "Hiatal hernia": ("Hiatal hernia.", "Sliding type hiatal hernia."),
    "Arterial wall calcification": ("Arterial wall calcification in the aorta.",
                                    "Arterial wall calcification, calcific atheroma plaques in the aorta."),
}
# Findings (desc) variants for a present abnormality.
DESC: dict[str, tuple[str, ...]] = {
    "Emphysema": ("Emphysema areas are observed in both lungs, more prominent in the upper lobes.",
                  "Centrilobular and paraseptal emphysema is observed in both lung parenchyma."),
    "Lung nodule": ("A {size} mm nodule is observed in the {lobe_long}.",
                    "A solid nodule measuring {size} mm was detected in the {lobe_long}."),
    "Lung opacity": ("Ground glass opacity areas are observed in the {lobes_long}.",
                     "There are ground glass density increases in the {lobes_long}."),
    "Consolidation": ("An area of consolidation with air bronchograms is observed in the {lobe_long}.",
                      "Consolidation is observed in the {lobe_long}, evaluated in favor of pneumonia."),
    "Pleural effusion": ("Pleural effusion reaching a thickness of {size} mm is observed {where}.",
                         "Pleural effusion with a thickness of {size} mm was detected {where}."),
    "Atelectasis": ("Linear atelectasis is observed in the {lobes_long}.",
                    "Subsegmental atelectasis is present in the {lobes_long}."),
    "Cardiomegaly": ("Heart size increased. Cardiothoracic ratio increased in favor of the heart.",
                     "Heart sizes have increased."),
    "Pericardial effusion": ("Pericardial effusion reaching {size} mm in thickness is observed.",
                             "Pericardial effusion with a thickness of {size} mm is present."),
    "Coronary artery wall calcification": ("Calcific atheroma plaques are observed in the coronary arteries.",
                                           "Calcified plaques are present in the coronary artery walls."),
    "Hiatal hernia": ("Sliding type hiatal hernia is observed at the lower end of the esophagus.",
                      "A hiatal hernia measuring {size} mm is observed at the esophagogastric junction."),
    "Arterial wall calcification": ("Calcific atheroma plaques are observed in the {aorta_loc}.",
                                    "Calcified atherosclerotic changes were observed in the wall of the "
                                    "{aorta_loc}."),
}
# Findings that rule out an absent abnormality. CT-RATE findings are full of such negatives
# ("No pleural effusion was detected."); without them the reports never say what "not X"
# means, and the zero-shot negative prompts ("Not X.") have nothing to match.
ABSENT_DESC: dict[str, tuple[str, ...]] = {
    "Emphysema": ("No emphysema was observed in both lungs.", "Emphysema was not detected."),
    "Lung nodule": ("No nodule was detected in both lungs.", "Nodule was not observed in the lung parenchyma."),
    "Lung opacity": ("No opacity was observed in the lung parenchyma.", "Opacity was not detected."),
    "Consolidation": ("No consolidation was detected.", "Consolidation was not observed in the lungs."),
    "Pleural effusion": ("No pleural effusion was detected.", "Pleural effusion was not observed."),
    "Atelectasis": ("No atelectasis was observed.", "Atelectatic changes were not detected."),
    "Cardiomegaly": ("No cardiomegaly was observed.", "Cardiomegaly was not detected."),
    "Pericardial effusion": ("No pericardial effusion was detected.", "Pericardial effusion was not observed."),
    "Coronary artery wall calcification": ("No coronary artery wall calcification was observed.",
                                           "Coronary artery wall calcification was not detected."),
    "Hiatal hernia": ("No hiatal hernia was detected.", "Hiatal hernia was not observed."),
    "Arterial wall calcification": ("No arterial wall calcification was observed in the aorta.",
                                    "Arterial wall calcification was not detected."),
}
ABSENT_DESC_PROB = 0.6  # chance that the findings rule out a given absent abnormality
# Findings of a normal anatomy (style of the CT-RATE reference texts); "" = no findings text.
NORMAL_DESC: dict[str, tuple[str, ...]] = {
    "lung": ("No mass lesion was detected in both lungs.",
             "No pneumonic infiltration or consolidation area was detected in the lung parenchyma.",
             "No suspicious mass or nodular space-occupying lesion was observed in the lung parenchyma.",
             "Aeration of both lung parenchyma is normal. No pleural effusion was detected.", ""),
    "heart": ("Heart contour, size are normal. Pericardial effusion-thickening was not observed.",
              "Heart contour and size are normal.",
              "Heart dimensions and compartments appear natural. Pericardial effusion was not detected.",
              "Heart contour size is natural.", ""),
    "esophagus": ("Thoracic esophagus calibration was normal and no significant tumoral wall thickening "
                  "was detected.",
                  "No pathological increase in wall thickness was observed in the thoracic esophagus.",
                  "No pathological wall thickness increase was observed in the esophagus within the sections.",
                  ""),
    "aorta": ("Thoracic aorta diameter is normal.", "No dilatation was detected in the thoracic aorta.", ""),
}
CLINICAL = ("Not given.", "Cough.", "Shortness of breath.", "Fever and cough.", "Chest pain.",
            "Follow-up of lung nodule.")
TECHNIQUE = "Non-contrast images were obtained in the axial plane with {thick} mm slice thickness."
FINDINGS_EXTRA = "Trachea and both main bronchi are open."
NORMAL_IMPRESSION = "No significant abnormality was detected."


def load_anatomies(path: Path = ANATOMY_MAP) -> list[tuple[str, list[str]]]:
    """(anatomy name, TotalSegmentator classes) of the CT-RATE anatomy map the generator simulates."""
    return load_anatomy_map(path)


@dataclass(frozen=True)
class ScanText:
    """Anatomy-wise texts of one scan."""

    conc: dict[str, str]  # abnormal anatomies only
    desc: dict[str, str]  # anatomies with a findings text


def _join_lobes(lobes: list[str], long: bool) -> str:
    """'right upper lobe and left lower lobe' (or the findings form); 'both lungs' when bilateral-wide."""
    uniq = list(dict.fromkeys(lobes))
    phrases = [LOBES[lb][1 if long else 0] for lb in uniq]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scan_texts(p: Phantom, rng: np.random.Generator, anatomies: list[str]) -> ScanText:
    """Impression and findings texts per anatomy, consistent with the painted lesions of `p`."""
    les = p.lesions
    conc: dict[str, list[str]] = {a: [] for a in anatomies}
    desc: dict[str, list[str]] = {a: [] for a in anatomies}

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    for abn in sorted(p.abnormalities, key=list(SIMULATED).index):
        anatomy = SIMULATED[abn][0]
        fill: dict[str, str] = {}
        if abn in ("Lung nodule", "Lung opacity", "Consolidation", "Atelectasis"):
            lobes = [lesion.lobe for lesion in les.in_lungs(abn)]
            fill = {"lobes": _join_lobes(lobes, False), "lobes_long": _join_lobes(lobes, True),
                    "lobe_long": LOBES[lobes[0]][1]}
            if abn == "Lung nodule":
                fill["size"] = str(int(round(2 * les.nodules[0].radius)))
                if len(set(lobes)) == 2:
                    fill["lobes"] = f"{LOBES[lobes[0]][0]} and another nodule in the {LOBES[lobes[1]][0]}"
        elif abn == "Pleural effusion":
            e = les.pleural_effusion
            fill = {"effusion": EFFUSION_SIDES[e.side][0], "where": EFFUSION_SIDES[e.side][1],
                    "size": str(int(round(e.depth)))}
        elif abn == "Pericardial effusion":
            fill = {"size": str(int(round(les.pericardial_effusion.thickness)))}
        elif abn == "Hiatal hernia":
            fill = {"size": str(int(round(2 * les.hiatal_hernia.radii.max())))}
        elif abn == "Arterial wall calcification":
            fill = {"aorta_loc": pick(AORTA_LOCATIONS)}
        conc[anatomy].append(pick(CONC[abn]).format(**fill))
        desc[anatomy].append(pick(DESC[abn]).format(**fill))
    for abn, (anatomy, _) in SIMULATED.items():
        if abn not in p.abnormalities and rng.random() < ABSENT_DESC_PROB:
            desc[anatomy].append(pick(ABSENT_DESC[abn]))
    out_desc: dict[str, str] = {}
    for a in anatomies:
        text = " ".join(([] if conc[a] else [pick(NORMAL_DESC[a])]) + desc[a]).strip()
        if text:
            out_desc[a] = text
    return ScanText({a: " ".join(c) for a, c in conc.items() if c}, out_desc)


def report_row(name: str, text: ScanText, rng: np.random.Generator, grid: Grid,
               anatomies: list[str]) -> dict[str, str]:
    """One CT-RATE report row of a reconstruction (`text`: its scan's anatomy-wise texts)."""
    findings = " ".join([FINDINGS_EXTRA] + [text.desc[a] for a in anatomies if a in text.desc])
    impressions = " ".join(text.conc[a] for a in anatomies if a in text.conc) or NORMAL_IMPRESSION
    return {"VolumeName": name, "ClinicalInformation_EN": CLINICAL[int(rng.integers(len(CLINICAL)))],
            "Technique_EN": TECHNIQUE.format(thick=f"{grid.spacing_xyz[2]:g}"),
            "Findings_EN": findings, "Impressions_EN": impressions}
