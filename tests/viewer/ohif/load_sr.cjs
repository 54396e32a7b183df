'use strict';
/*
 * Load one of our SRs the way the OHIF viewer (3.x) does, headless, and print what it shows.
 *
 * Usage: node --experimental-require-module load_sr.cjs SR.dcm SOURCE.dcm
 *
 * Real code, from the npm registry at the versions pinned in package-lock.json:
 *   @ohif/extension-cornerstone-dicom-sr  its SOP class handler (getDisplaySetsFromSeries, load:
 *                                          TID 1500 parsing, placing each measurement on the
 *                                          referenced image, adding the SR display annotation)
 *   @ohif/core                            DicomMetadataStore, MetadataProvider, DisplaySetService,
 *                                          MeasurementService, CustomizationService
 *   @cornerstonejs/core, tools, adapters  image-to-world coordinates, the annotation state
 *   dcmjs                                 reading and naturalizing the DICOM files, as OHIF does
 *   jsdom                                 the DOM that @ohif/core expects at import time
 * Not loaded (see docs/sr.md): React UI packages the SR extension imports at the top but the SOP
 * class handler never calls. @ohif/extension-cornerstone is replaced by the two constants the
 * handler reads from it (its Enums.CORNERSTONE_3D_TOOLS_SOURCE_NAME / _VERSION), @ohif/i18n and
 * @ohif/ui-next by empty modules, and "@ohif/core/src/contextProviders/SystemProvider" — a source
 * path @ohif/core does not publish — by an empty hook.
 *
 * Prints one JSON object: {"measurements": [...], "annotations": [...]}; exits 1 on any error.
 */
const fs = require('fs');
const Module = require('module');
const { JSDOM } = require('jsdom');

const dom = new JSDOM('<!doctype html><html><body></body></html>', { url: 'http://localhost/' });
globalThis.self = dom.window;
for (const key of ['window', 'document', 'navigator', 'HTMLElement', 'HTMLDivElement', 'Element', 'Node', 'localStorage', 'sessionStorage', 'location']) {
  if (!(key in globalThis)) globalThis[key] = dom.window[key];
}
// Events dispatched on jsdom nodes must be jsdom's (Node's own Event/CustomEvent are not).
globalThis.Event = dom.window.Event;
globalThis.CustomEvent = dom.window.CustomEvent;

const UI_ONLY = {
  '@ohif/extension-cornerstone': {
    Enums: { CORNERSTONE_3D_TOOLS_SOURCE_NAME: 'Cornerstone3DTools', CORNERSTONE_3D_TOOLS_SOURCE_VERSION: '0.1' },
  },
  '@ohif/i18n': {},
  '@ohif/ui-next': {},
  '@ohif/core/src/contextProviders/SystemProvider': { useSystem: () => ({}) },
};
const originalLoad = Module._load;
Module._load = function load(request, parent, isMain) {
  if (Object.prototype.hasOwnProperty.call(UI_ONLY, request)) return UI_ONLY[request];
  return originalLoad.call(this, request, parent, isMain);
};

const dcmjs = require('dcmjs');
const core = require('@ohif/core');
const cornerstone = require('@cornerstonejs/core');
const tools = require('@cornerstonejs/tools');
const srExtension = require('@ohif/extension-cornerstone-dicom-sr');

function readNaturalized(path) {
  const bytes = fs.readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const file = dcmjs.data.DicomMessage.readFile(buffer);
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(file.dict);
  delete dataset.PixelData; // the handler needs the header only
  return dataset;
}

async function main() {
  const [srPath, sourcePath] = process.argv.slice(2);
  const sr = readNaturalized(srPath);
  const source = readNaturalized(sourcePath);
  const wadoRoot = 'http://localhost/dicom-web';
  const imageId = `wadors:${wadoRoot}/studies/${source.StudyInstanceUID}/series/${source.SeriesInstanceUID}` +
    `/instances/${source.SOPInstanceUID}/frames/1`;

  // What OHIF's cornerstone extension wires at start: OHIF's metadata behind cornerstone's.
  core.DicomMetadataStore.addInstances([{ ...source, imageId, wadoRoot }], true);
  const metadataProvider = core.classes.MetadataProvider;
  cornerstone.metaData.addProvider((type, id) => metadataProvider.get(type, id), 10000);

  const warnings = [];
  const commandsManager = new core.CommandsManager({});
  const services = {
    displaySetService: new core.DisplaySetService(),
    measurementService: new core.MeasurementService(),
    customizationService: new core.CustomizationService({ commandsManager, configuration: {} }),
    uiNotificationService: { show: (notice) => warnings.push(notice.message) },
  };
  const imageDisplaySet = {
    displaySetInstanceUID: 'source-image',
    StudyInstanceUID: source.StudyInstanceUID,
    SeriesInstanceUID: source.SeriesInstanceUID,
    SOPClassUID: source.SOPClassUID,
    sopClassUids: [source.SOPClassUID],
    images: [source],
    instances: [source],
    unsupported: false,
  };
  services.displaySetService.addDisplaySets(imageDisplaySet);
  const dataSource = {
    getImageIdsForDisplaySet: (displaySet) => (displaySet === imageDisplaySet ? [imageId] : []),
    retrieve: { bulkDataURI: async () => { throw new Error('no bulk data expected in our SR'); } },
  };
  const servicesManager = { services };
  const extensionManager = { getDataSources: () => [dataSource] };

  const handlers = srExtension.default.getSopClassHandlerModule({ servicesManager, extensionManager });
  const handler = handlers.find((h) => h.sopClassUids.includes(sr.SOPClassUID) && h.name === 'dicom-sr');
  if (!handler) throw new Error(`no OHIF SR handler for SOP class ${sr.SOPClassUID}`);
  const displaySets = handler.getDisplaySetsFromSeries([sr]);
  if (displaySets.length !== 1) throw new Error(`handler made ${displaySets.length} display sets: ${warnings}`);
  const [srDisplaySet] = displaySets;
  await srDisplaySet.load();

  const measurements = srDisplaySet.measurements.map((m) => ({
    loaded: m.loaded,
    labels: m.labels,
    trackingUniqueIdentifier: m.TrackingUniqueIdentifier,
    trackingIdentifier: m.TrackingIdentifier,
    referencedSOPInstanceUID: m.ReferencedSOPInstanceUID,
    imageId: m.imageId,
  }));
  const annotations = tools.annotation.state.getAllAnnotations().map((a) => ({
    toolName: a.metadata.toolName,
    graphicType: a.metadata.graphicType,
    referencedImageId: a.metadata.referencedImageId,
    label: a.data.label,
    labels: a.data.labels,
    points: a.data.handles.points,
  }));
  process.stdout.write(JSON.stringify({ warnings, measurements, annotations }) + '\n');
}

main().catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
