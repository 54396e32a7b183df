"""HL7 v2.5.1 over MLLP: ORU^R01 results out, ORM^O01 / OMI^O23 orders in.

Not built yet: it arrives with its own issue.
"""
