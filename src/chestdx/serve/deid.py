"""Removing what identifies a person from a DICOM file before anything is stored or logged.

The attributes of the DICOM PS3.15 Annex E basic profile that name or locate a person, plus all
private tags (vendors hide names there). Pixel data with burned-in text is out of scope.
"""

from __future__ import annotations

import io

import pydicom

IDENTIFYING = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientInsurancePlanCodeSequence", "MedicalRecordLocator", "MilitaryRank",
    "EthnicGroup", "PatientComments", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "AccessionNumber", "StudyID", "DeviceSerialNumber",
    "RequestAttributesSequence", "AdmissionID", "ResponsiblePerson", "ResponsibleOrganization",
)


def deidentify_dicom(data: bytes) -> bytes:
    """The DICOM file without identifying attributes and private tags."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    for keyword in IDENTIFYING:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()
