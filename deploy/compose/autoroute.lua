-- Orthanc as the hospital PACS: every image it receives is pushed on to Pneumo Gateway (the
-- "pneumo" entry of DicomModalities in orthanc.json). What the gateway itself sends back (its SR
-- and summary image, calling AE "PNEUMO") stays here: forwarding it would loop.
local GATEWAY = 'pneumo'
local GATEWAY_AE = 'PNEUMO'

function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin ~= nil and origin['RemoteAet'] == GATEWAY_AE then
      return
   end
   -- Asynchronous C-STORE job: Orthanc retries nothing itself, the job shows in Explorer > Jobs.
   SendToModality(instanceId, GATEWAY)
end
