import { status } from "@grpc/grpc-js";
import { FieldError } from "../common/errors.js";
import { ShareMode } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import type { HookPoint } from "./hook-point.js";
import type { Cursor } from "./pool.js";

type Share = "fan_out" | "split";

/** Trainers of one group on one hook point. A split group reads through one shared cursor. */
interface Group {
  share: Share;
  members: number;
  shared: Cursor | undefined;
  /** Set while a split group has no member and keeps its place for one that comes back. */
  parked?: NodeJS.Timeout;
}

/** A fan-out trainer's cursor kept after its stream broke, for it to read on from. */
interface Parked {
  hook: HookPoint;
  cursor: Cursor;
  timer: NodeJS.Timeout;
}

/**
 * Who reads each pool: groups of trainers and their cursors. A trainer whose stream broke (its
 * process died, the network failed) keeps its place for `awayMs`: when it comes back, reconnected or
 * restarted under the same id, it reads on from there, so no row of a fill reaches it twice. A
 * trainer that announced it is done gives its place up at once; one that stays away longer than
 * `awayMs` loses it, and the rows it held back go to the others.
 */
export class Consumers {
  private readonly groups = new Map<HookPoint, Map<string, Group>>();
  private readonly parked = new Map<string, Parked>();
  /** (hook point, trainer) pairs said done: a stream of theirs that ends now keeps no place. */
  private readonly finished = new Set<string>();

  constructor(
    private readonly defaultShare: Share,
    private readonly awayMs: number,
  ) {}

  /** The cursor `trainerId` reads `hook` through in group `name`. */
  attach(hook: HookPoint, name: string, requested: ShareMode, trainerId: string): Cursor {
    let groups = this.groups.get(hook);
    if (!groups) this.groups.set(hook, (groups = new Map()));
    const asked: Share | undefined = requested === ShareMode.SPLIT ? "split" : requested === ShareMode.FAN_OUT ? "fan_out" : undefined;
    let group = groups.get(name);
    if (!group) {
      const share = asked ?? this.defaultShare;
      group = { share, members: 0, shared: share === "split" ? hook.pool.openCursor() : undefined };
      groups.set(name, group);
    } else if (asked && asked !== group.share) {
      throw new FieldError(
        "share",
        `group "${name}" on ${hook.name} is ${group.share}; this trainer asked for ${asked}`,
        status.FAILED_PRECONDITION,
      );
    }
    clearTimeout(group.parked);
    group.parked = undefined;
    group.members++;
    if (group.shared) return group.shared;
    const key = parkKey(hook, name, trainerId);
    const back = this.parked.get(key);
    if (!back) return hook.pool.openCursor();
    clearTimeout(back.timer);
    this.parked.delete(key);
    return back.cursor;
  }

  /** A stream ended; `broken` when it did not end by itself (the trainer may come back for its place). */
  detach(hook: HookPoint, name: string, trainerId: string, cursor: Cursor, broken: boolean): void {
    const groups = this.groups.get(hook)!;
    const group = groups.get(name)!;
    group.members--;
    broken &&= !this.finished.has(doneKey(hook.name, trainerId));
    if (!group.shared) {
      if (broken) this.park(parkKey(hook, name, trainerId), hook, cursor);
      else hook.closeCursor(cursor);
    }
    if (group.members > 0) return;
    if (!group.shared) return void groups.delete(name);
    if (!broken) return this.dropGroup(hook, name, group);
    group.parked = setTimeout(() => this.dropGroup(hook, name, group), this.awayMs);
    group.parked.unref();
  }

  /** `trainerId` is done with `hookPoints`: the places it kept on them are given up (it may still read others). */
  done(trainerId: string, hookPoints: readonly string[]): void {
    for (const h of hookPoints) this.finished.add(doneKey(h, trainerId));
    for (const [key, p] of this.parked) {
      if (!key.endsWith(`\0${trainerId}`) || !hookPoints.includes(p.hook.name)) continue;
      clearTimeout(p.timer);
      this.parked.delete(key);
      p.hook.closeCursor(p.cursor);
    }
  }

  /** Cancels every wait (shutdown). */
  close(): void {
    for (const p of this.parked.values()) clearTimeout(p.timer);
    for (const groups of this.groups.values()) for (const g of groups.values()) clearTimeout(g.parked);
  }

  private park(key: string, hook: HookPoint, cursor: Cursor): void {
    const timer = setTimeout(() => {
      this.parked.delete(key);
      hook.closeCursor(cursor);
    }, this.awayMs);
    timer.unref();
    this.parked.set(key, { hook, cursor, timer });
  }

  private dropGroup(hook: HookPoint, name: string, group: Group): void {
    clearTimeout(group.parked);
    const groups = this.groups.get(hook);
    if (groups?.get(name) !== group || group.members > 0) return;
    groups.delete(name);
    if (group.shared) hook.closeCursor(group.shared);
  }
}

const parkKey = (hook: HookPoint, group: string, trainerId: string) => `${hook.name}\0${group}\0${trainerId}`;
const doneKey = (hookPoint: string, trainerId: string) => `${hookPoint}\0${trainerId}`;
