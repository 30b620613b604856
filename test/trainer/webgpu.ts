import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Placement } from "../../services/trainer/placement.js";

/**
 * WebGPU without a GPU: Dawn over SwiftShader, the Vulkan driver on the CPU that Debian's chromium
 * package ships (.ci/run installs chromium and libvulkan1). The tests always use it, even on a
 * machine with a GPU, so that they see the same device everywhere.
 */
export const SWIFTSHADER_ICD = "/usr/lib/chromium/vk_swiftshader_icd.json";

let runtimeDir: string | undefined;

/** The environment a process needs to find SwiftShader: the ICD, and the runtime folder Dawn wants (mode 0700). */
export function webgpuEnv(): Record<string, string> {
  if (!existsSync(SWIFTSHADER_ICD)) {
    throw new Error(`${SWIFTSHADER_ICD} is missing: install Debian's chromium and libvulkan1 (bash .ci/run does)`);
  }
  runtimeDir ??= mkdtempSync(join(tmpdir(), "saeflow-xdg-"));
  return { VK_ICD_FILENAMES: SWIFTSHADER_ICD, XDG_RUNTIME_DIR: runtimeDir };
}

/** Points this process's WebGPU at SwiftShader; call before the first WebGPU session opens. */
export function useSwiftShader(): void {
  Object.assign(process.env, webgpuEnv());
}

export const WEBGPU: Placement = { provider: "webgpu", deviceId: 0, threads: 1 };
